"""Explanations and defect localization: patch-level anomaly maps (and, later, Grad-CAM, tables, rendering)."""
from core.explain.patch import PatchLocalizer, image_scores_from_maps
from core.explain.smoothing import gaussian_blur, upsample_and_smooth

__all__ = [
    "PatchLocalizer",
    "gaussian_blur",
    "image_scores_from_maps",
    "upsample_and_smooth",
]
