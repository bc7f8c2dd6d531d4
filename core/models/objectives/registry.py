"""Objectives by name: what a config and the CLI's ``--objective`` choose from."""
from __future__ import annotations

import inspect

from core.errors import ConfigError
from core.models.objectives._base import Objective
from core.models.objectives.contrastive import ImageContrastiveObjective
from core.models.objectives.cutpaste import CutPasteObjective
from core.models.objectives.rotation import RotationObjective
from core.models.objectives.tabular import TableContrastiveObjective

KINDS = ("images", "table")

OBJECTIVES: dict[str, tuple[str, ...]] = {
    "cutpaste": ("images",),
    "cutpaste-binary": ("images",),
    "cutpaste-scar": ("images",),
    "rotation": ("images",),
    "contrastive": ("images", "table"),
    "contrastive-imix": ("images", "table"),
}

# (name, kind) -> (class, arguments fixed by the name, which **options may not contradict)
_BUILDERS: dict[tuple[str, str], tuple[type[Objective], dict[str, object]]] = {
    ("cutpaste", "images"): (CutPasteObjective, {"variant": "3way"}),
    ("cutpaste-binary", "images"): (CutPasteObjective, {"variant": "binary"}),
    ("cutpaste-scar", "images"): (CutPasteObjective, {"variant": "scar"}),
    ("rotation", "images"): (RotationObjective, {}),
    ("contrastive", "images"): (ImageContrastiveObjective, {"imix": False}),
    ("contrastive-imix", "images"): (ImageContrastiveObjective, {"imix": True}),
    ("contrastive", "table"): (TableContrastiveObjective, {"imix": False}),
    ("contrastive-imix", "table"): (TableContrastiveObjective, {"imix": True}),
}


def make_objective(name: str, embedding_dim: int, kind: str, **options) -> Objective:
    """A fresh objective (heads initialised from torch's global random state).

    Parameters
    ----------
    name : str
        One of :data:`OBJECTIVES`: "cutpaste" (3-way: normal / cutpaste / scar),
        "cutpaste-binary", "cutpaste-scar", "rotation" (images only), "contrastive"
        (DROC's distribution-augmented contrastive learning on images; masked, noisy views
        on tables) and "contrastive-imix" (the same with i-Mix).
    embedding_dim : int
        Width ``D`` of the encoder's ``(B, D)`` output.
    kind : {"images", "table"}
        The kind of data the encoder reads.
    **options
        The objective's own options, e.g. ``temperature=0.5`` or ``head_dims=(256,)``; see
        the class named for ``name`` in :data:`_BUILDERS`.

    Returns
    -------
    objective : Objective

    Raises
    ------
    ConfigError
        Unknown name, kind or option, a name that does not support ``kind``, an option the
        name already fixes (e.g. ``imix=True`` with "contrastive"), or a bad option value;
        the message lists the allowed values.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if kind not in OBJECTIVES[name]:
        usable = [other for other, kinds in OBJECTIVES.items() if kind in kinds]
        raise ConfigError(
            f"objective {name!r} works on {' and '.join(OBJECTIVES[name])} only; "
            f"for {kind} choose one of {', '.join(usable)}"
        )
    cls, preset = _BUILDERS[(name, kind)]
    allowed = [p for p in inspect.signature(cls).parameters if p != "embedding_dim" and p not in preset]
    for key, value in options.items():
        if key in preset and value != preset[key]:
            raise ConfigError(f"objective {name!r} fixes {key}={preset[key]!r}; choose another objective name instead")
        if key not in preset and key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} for objective {name!r} on {kind}; allowed: {', '.join(allowed) or 'none'}"
            )
    return cls(embedding_dim, **{**options, **preset})
