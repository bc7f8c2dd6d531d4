"""Every knob of a fit, as a frozen dataclass with validation and a JSON round-trip."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from core.detectors.registry import DETECTORS as DETECTOR_NAMES
from core.data.columns import ColumnChoice
from core.errors import ConfigError

BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
FEATURE_LAYERS = ("stride8", "stride16", "stride32", "head")
OBJECTIVES = ("none", "cutpaste", "cutpaste-binary", "cutpaste-scar", "rotation", "contrastive", "contrastive-imix")
TABLE_OBJECTIVES = ("none", "contrastive", "contrastive-imix")
ENCODERS = ("auto", "pretrained-finetune", "resnet18", "small-cnn", "mlp")
SMALL_CNN_MAX_SIDE = 32
DETECTORS = ("auto", *DETECTOR_NAMES)
AUTO_DETECTOR = {"images": "gde", "table": "knn"}
AUTO_REFINE_DETECTOR = {"images": "mcd", "table": "knn"}
"""What ``refine_detector="auto"`` means per kind of data, chosen on the dev half of bench/refinement.py by
bench/explore_refinement.py (docs/benchmarks.md)."""
"""What ``detector="auto"`` means per kind of data, chosen by bench/tables.py, bench/mvtec_bottle.py
and bench/fashion_mnist.py (docs/benchmarks.md)."""
THRESHOLD_SOURCES = ("held_out", "in_sample")
LOCALIZATIONS = ("memory", "gaussian", "cutpaste", "none")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FitConfig:
    """How a run is fitted. Defaults are the benchmarked choices (see docs/benchmarks.md).

    Attributes
    ----------
    backbone : str
        Image representation: an ImageNet-pretrained EfficientNet-Lite (``BACKBONES``).
        Ignored for tables, which use the tabular encoder.
    image_size : int
        Images are resized to a square of this many pixels before the backbone.
    feature_layers : tuple of str
        Which global-average-pooled stage ends form the image embedding, concatenated:
        ``stride8`` (40 channels on Lite0), ``stride16`` (112), ``stride32`` (320), ``head`` (1280).
    objective : str
        Representation learning objective (``OBJECTIVES``): ``none`` uses the frozen pretrained
        features (images) or the scaled columns (tables); the others train an encoder
        self-supervised: CutPaste (3-way, binary, scar), rotation prediction, contrastive learning
        with distribution augmentation (optionally with i-Mix). Tables allow ``TABLE_OBJECTIVES``.
    encoder : str
        What the objective trains (``ENCODERS``): ``auto`` fine-tunes the pretrained backbone for
        CutPaste (ImageNet features transfer best, as in the CutPaste paper), trains a ResNet-18
        from scratch for the other image objectives (a small CNN at 32 px and below) and an MLP
        for tables. Ignored when ``objective`` is ``none``.
    epochs : int
        Training epochs on all the data before the first refinement round.
    retrain_epochs : int
        Epochs of fine-tuning on the kept data after each refinement round (STOC self-training);
        0 keeps the first representation throughout.
    learning_rate : float or None
        Peak learning rate of the training loop; None uses the loop's default
        (:class:`core.train.TrainConfig`).
    detector : str
        One-class detector for the final scores and the ``is_anomaly`` threshold (``DETECTORS``);
        ``auto`` picks GDE for images and kNN distance for tables (``AUTO_DETECTOR``), resolved by
        :meth:`for_data`.
    refine_detector : str
        One-class detector of the refinement ensemble and the contamination estimate (``DETECTORS``);
        ``auto`` picks the robust Gaussian (``mcd``) for images, which a recurring defect cannot mask,
        and kNN distance for tables (``AUTO_REFINE_DETECTOR``).
    refine : bool
        Run STOC data refinement before fitting the final detector.
    ensemble : int
        K, the number of disjoint subsets (one detector each) per refinement round.
    gamma : float or "auto"
        Share of the training set each ensemble member flags per round; ``auto`` estimates the
        contamination from the data in every round (see :func:`core.refine.estimate_contamination`).
    rounds : int
        Maximum number of refinement rounds (ends early once the kept set stops changing).
    threshold_source : str
        ``held_out``: each member's threshold is a quantile of its scores on samples it did not
        train on; ``in_sample``: on its own training subset (collapses in high dimensions).
    min_keep_fraction : float
        Refinement never keeps fewer than this share of the training data.
    false_alarm_rate : float
        The share of normal data that ``is_anomaly`` is meant to flag: the threshold is set on
        out-of-sample scores of the training samples, with the estimated contamination share of
        them taken to be anomalous (see :func:`core.engine.refine_and_fit`).
    localization : str
        Patch model for image anomaly maps, fitted on the kept training images: ``memory``
        (nearest-neighbour distance to a coreset of normal patches; any layout), ``gaussian`` (one
        Gaussian per location; aligned objects), ``cutpaste`` (a CutPaste patch model trained on
        the kept images, dense Mahalanobis scores at stride 4, receptive-field upsampling; see
        :mod:`core.explain.cutpaste_patch`) or ``none`` (no maps). Ignored for tables.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    batch_size : int
        Images per forward pass.
    seed : int
        Seed for every stochastic step.
    label_column : str or None
        Table column holding labels (used for metrics only, never for fitting); None finds a 0/1
        column named like a label, ``"none"`` means the table has no label column.
    id_column : str
        Table column that names the rows, carried into every output and never a feature:
        ``"auto"`` (a column with a distinct text or counter in every row), a name, or ``"none"``
        (0-based row numbers).
    ignore_columns : tuple of str
        Table columns left out of the fit (see :mod:`core.data.columns`).
    """

    backbone: str = "efficientnet-lite0"
    image_size: int = 224
    feature_layers: tuple[str, ...] = ("stride16", "stride32")
    objective: str = "none"
    encoder: str = "auto"
    epochs: int = 20
    retrain_epochs: int = 5
    learning_rate: float | None = None
    detector: str = "auto"
    refine_detector: str = "auto"
    refine: bool = True
    ensemble: int = 5
    gamma: float | str = "auto"
    rounds: int = 3
    threshold_source: str = "held_out"
    min_keep_fraction: float = 0.5
    false_alarm_rate: float = 0.05
    localization: str = "memory"
    device: str = "auto"
    batch_size: int = 32
    seed: int = 0
    label_column: str | None = None
    id_column: str = "auto"
    ignore_columns: tuple[str, ...] = ()

    def validate(self) -> "FitConfig":
        """Return self, or raise ConfigError naming the bad value and the allowed ones."""
        _choice("backbone", self.backbone, BACKBONES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("encoder", self.encoder, ENCODERS)
        if self.epochs < 1 or self.retrain_epochs < 0:
            raise ConfigError(f"epochs must be >= 1 and retrain_epochs >= 0, got {self.epochs} and {self.retrain_epochs}")
        if self.learning_rate is not None and not 0.0 < self.learning_rate < 10.0:
            raise ConfigError(f"learning_rate must be in (0, 10) or None for the default, got {self.learning_rate}")
        _choice("detector", self.detector, DETECTORS)
        _choice("refine_detector", self.refine_detector, DETECTORS)
        _choice("threshold_source", self.threshold_source, THRESHOLD_SOURCES)
        _choice("device", self.device, DEVICES)
        _choice("localization", self.localization, LOCALIZATIONS)
        if not self.feature_layers:
            raise ConfigError(f"feature_layers is empty; choose from {', '.join(FEATURE_LAYERS)}")
        for layer in self.feature_layers:
            _choice("feature_layers", layer, FEATURE_LAYERS)
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [32, 1024] pixels, got {self.image_size}")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble (K) must be >= 1, got {self.ensemble}")
        if self.refine and self.threshold_source == "held_out" and self.ensemble < 2:
            raise ConfigError("held-out thresholds need an ensemble of K >= 2; raise ensemble or use in_sample")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")
        if isinstance(self.gamma, str):
            if self.gamma != "auto":
                raise ConfigError(f"gamma must be a number in (0, 0.5] or 'auto', got {self.gamma!r}")
        elif not 0.0 < float(self.gamma) <= 0.5:
            raise ConfigError(f"gamma must be a number in (0, 0.5] or 'auto', got {self.gamma}")
        if not 0.0 < self.min_keep_fraction <= 1.0:
            raise ConfigError(f"min_keep_fraction must be in (0, 1], got {self.min_keep_fraction}")
        if not 0.0 < self.false_alarm_rate < 0.5:
            raise ConfigError(f"false_alarm_rate must be in (0, 0.5), got {self.false_alarm_rate}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    def for_data(self, kind: str) -> "FitConfig":
        """This config with ``detector``, ``refine_detector`` and ``encoder`` ``auto`` resolved for ``kind`` (``images`` or ``table``).

        Raises ConfigError when the objective or encoder does not apply to that kind of data.
        """
        config = self if self.detector != "auto" else replace(self, detector=AUTO_DETECTOR[kind])
        if config.refine_detector == "auto":
            config = replace(config, refine_detector=AUTO_REFINE_DETECTOR[kind])
        if config.objective == "none":
            return config
        if kind == "table" and config.objective not in TABLE_OBJECTIVES:
            raise ConfigError(f"objective {config.objective!r} is for images; tables allow {', '.join(TABLE_OBJECTIVES)}")
        if config.encoder == "auto":
            config = replace(config, encoder=_auto_encoder(kind, config.objective, config.image_size))
        if (kind == "table") != (config.encoder == "mlp"):
            raise ConfigError(f"encoder {config.encoder!r} does not fit {kind} data; use 'auto'")
        return config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FitConfig":
        """Parse a config written by :meth:`to_json`; unknown keys are an error."""
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        for name in ("feature_layers", "ignore_columns"):
            if name in raw:
                raw[name] = tuple(raw[name])
        return cls(**raw).validate()

    def save(self, path: Path) -> None:
        from core.store import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        """Read a config written by :meth:`save`; a damaged file is a RunError."""
        from core.store import read_json

        return cls.from_json(json.dumps(read_json(path)))

    def column_choice(self) -> ColumnChoice:
        """The table column roles this config asks for."""
        return ColumnChoice(self.label_column, self.id_column, tuple(self.ignore_columns))

    def with_changes(self, **changes: Any) -> "FitConfig":
        return replace(self, **changes).validate()


def _auto_encoder(kind: str, objective: str, image_size: int) -> str:
    if kind == "table":
        return "mlp"
    if objective.startswith("cutpaste"):
        return "pretrained-finetune"
    return "small-cnn" if image_size <= SMALL_CNN_MAX_SIDE else "resnet18"


def parse_gamma(text: str) -> float | str:
    """Parse a CLI/UI gamma value: a number or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"gamma must be a number in (0, 0.5] or 'auto', got {text!r}") from None


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
