"""Small real data sets built on the fly for engine, CLI and studio tests (sklearn's bundled digits, a
payments table)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits



def digits_contaminated(normal_digit=0, n_normal=150, n_anomalous=15, seed=0):
    """Digits images ``(N, 8, 8)`` in 0..16 and 0/1 labels: one digit as normal, others as anomalies."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    normal = rng.choice(np.flatnonzero(digits.target == normal_digit), n_normal, replace=False)
    anomalous = rng.choice(np.flatnonzero(digits.target != normal_digit), n_anomalous, replace=False)
    index = rng.permutation(np.r_[normal, anomalous])
    return digits.images[index], (digits.target[index] != normal_digit).astype(int)


def write_digits_table(path: Path, *, with_labels=True, **kwargs) -> Path:
    images, labels = digits_contaminated(**kwargs)
    frame = pd.DataFrame(images.reshape(len(images), -1), columns=[f"px{i}" for i in range(64)])
    if with_labels:
        frame["label"] = labels
    frame.to_csv(path, index=False)
    return path


def write_digits_images(folder: Path, *, labelled_folders=True, size=32, **kwargs) -> Path:
    """PNG files; with ``labelled_folders`` normals go to ``good/`` and anomalies to ``defect/``."""
    images, labels = digits_contaminated(**kwargs)
    for index, (image, label) in enumerate(zip(images, labels)):
        sub = ("defect" if label else "good") if labelled_folders else "all"
        target = folder / sub / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(target)
    return folder


def fraud_table(rows: int = 200, seed: int = 0) -> pd.DataFrame:
    """A payments table whose columns take every role: ``record`` (``REC-000100``...: the id),
    ``amount`` and ``duration`` (numbers), ``site`` (three categories) and ``is_fraud`` (0/1, the label).
    One row in ten is a fraud, with an amount and a duration far from the others."""
    rng = np.random.default_rng(seed)
    fraud = np.zeros(rows, dtype=int)
    fraud[rng.choice(rows, rows // 10, replace=False)] = 1
    return pd.DataFrame({
        "record": [f"REC-{100 + i:06d}" for i in range(rows)],
        "amount": np.round(np.where(fraud, rng.normal(5000, 500, rows), rng.normal(100, 20, rows)), 2),
        "duration": np.round(np.where(fraud, rng.normal(2, 0.5, rows), rng.normal(30, 5, rows)), 1),
        "site": rng.choice(["north", "south", "east"], rows),
        "is_fraud": fraud,
    })
