"""Self-supervised objectives: each is an augmentation, its head(s) and a loss; the encoder is passed in.

``make_objective(name, embedding_dim, kind, **options)`` builds one by name; ``OBJECTIVES``
maps each name to the kinds of data ("images", "table") it supports. The augmentations are
pure, batched functions driven by a ``torch.Generator``.
"""
from core.models.objectives._base import Objective, mlp_head
from core.models.objectives.color import color_jitter, random_grayscale
from core.models.objectives.contrastive import ContrastiveObjective, ImageContrastiveObjective, mix_inputs
from core.models.objectives.cutpaste import CutPasteObjective, cutpaste, scar, scar_size_range
from core.models.objectives.losses import imix_nt_xent, nt_xent
from core.models.objectives.registry import KINDS, OBJECTIVES, make_objective
from core.models.objectives.rotation import RotationObjective, rotate_batch, rotate_each
from core.models.objectives.tabular import TableContrastiveObjective, table_view
from core.models.objectives.views import default_crop_scale, image_view, random_resized_crop

__all__ = [
    "KINDS",
    "OBJECTIVES",
    "ContrastiveObjective",
    "CutPasteObjective",
    "ImageContrastiveObjective",
    "Objective",
    "RotationObjective",
    "TableContrastiveObjective",
    "color_jitter",
    "cutpaste",
    "default_crop_scale",
    "image_view",
    "imix_nt_xent",
    "make_objective",
    "mix_inputs",
    "mlp_head",
    "nt_xent",
    "random_grayscale",
    "random_resized_crop",
    "rotate_batch",
    "rotate_each",
    "scar",
    "scar_size_range",
    "table_view",
]
