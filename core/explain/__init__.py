"""Explanations and defect localization: patch maps, Grad-CAM of the anomaly score, table attributions, rendering."""
from core.explain.attribution import (
    FeatureAttribution,
    RowExplanation,
    explain_table_rows,
    feature_contributions,
    top_deviating_features,
)
from core.explain.cutpaste_patch import CutPastePatchLocalizer
from core.explain.gradcam import MahalanobisTarget, ScoreExplainer, find_target_layer
from core.explain.localizer import image_scores_from_maps
from core.explain.patch import PatchLocalizer
from core.explain.render import colorize, mask_contour, overlay, threshold_map
from core.explain.smoothing import gaussian_blur, upsample_and_smooth

__all__ = [
    "CutPastePatchLocalizer",
    "FeatureAttribution",
    "MahalanobisTarget",
    "PatchLocalizer",
    "RowExplanation",
    "ScoreExplainer",
    "colorize",
    "explain_table_rows",
    "feature_contributions",
    "find_target_layer",
    "gaussian_blur",
    "image_scores_from_maps",
    "mask_contour",
    "overlay",
    "threshold_map",
    "top_deviating_features",
    "upsample_and_smooth",
]
